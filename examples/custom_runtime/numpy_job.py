"""Functions that need numpy, on a custom runtime built from examples/custom_runtime/Dockerfile.

On Azure, after `acx runtime build` and `acx runtime deploy` (see the Dockerfile):
    ACX_BACKEND=azure_containers ACX_RUNTIME=myregistry.azurecr.io/me/numpy-rt:1 \
        python examples/custom_runtime/numpy_job.py
Locally it runs on the embedded runtime, which has whatever this Python has.
"""

import asyncio

from async_ca_exec import AsyncExecutor


def spectrum_peak(seed: int) -> float:
    import numpy as np  # imported where it runs: in the runtime image

    rng = np.random.default_rng(seed)
    signal = np.sin(np.linspace(0, 200 * np.pi, 4096)) + rng.normal(scale=0.5, size=4096)
    return float(np.abs(np.fft.rfft(signal)).argmax())


async def main() -> None:
    async with AsyncExecutor() as ex:
        try:
            peaks = await ex.map(spectrum_peak, range(100))
        except ModuleNotFoundError as exc:
            print(f"this runtime lacks {exc.name}: build and deploy examples/custom_runtime/Dockerfile")
            return
        print(f"100 spectra, peak bins: {sorted(set(peaks))}")


if __name__ == "__main__":
    asyncio.run(main())
