import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "batchcap" / "__init__.py").read_text()).group(1)

setup(
    name="batchcap",
    version=version,
    description="Caption images and transcribe recordings in batches into parquet/CSV tables, "
                "with WER and caption metrics, resumable and cron-safe.",
    long_description=(here / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["batchcap", "batchcap.*"]),
    package_data={"batchcap.report": ["templates/*.j2", "templates/*.css", "templates/*.js"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.2",
        "transformers>=5.0,<6",
        "numpy>=1.24",
        "pyarrow>=14",
        "click>=8.1",
        "tqdm>=4.60",
        "requests>=2.28",
        "urllib3>=2.2",  # HTTPResponse.read1: a body read returns what has arrived
        "pillow>=10",
        "soundfile>=0.12",
        "soxr>=0.3",
        "av>=11",
        "jiwer>=3.0",
        "num2words>=0.5.12",  # WER: numbers spelled in the row's language ("1" and "uno" are one word)
        "rapidfuzz>=3",  # jiwer's aligner, called directly by batchcap report
        "jinja2>=3.0",  # batchcap report
        "fsspec>=2024.6",  # object-store URLs (s3://, gs://, az://, hf://); the backends are extras
    ],
    extras_require={
        "train": ["peft>=0.13", "accelerate>=1.0", "matplotlib>=3.7"],
        "tiff": ["tifffile>=2023.1"],  # TIFFs Pillow cannot open (float samples, planar layouts)
        "ray": ["ray>=2.40"],
        "bench": ["faster-whisper>=1.0", "psutil>=5"],
        # inputs and outputs in object storage (fsspec backends)
        "s3": ["s3fs>=2024.6"],
        "gcs": ["gcsfs>=2024.6"],
        "azure": ["adlfs>=2024.4"],
        # everything the tests exercise (the Ray engine and both fine-tunes included)
        "dev": ["pytest>=8", "pytest-timeout>=2", "ruff>=0.6", "scikit-image>=0.22", "tifffile>=2023.1",
                "pycocoevalcap>=1.2", "html5lib>=1.1", "peft>=0.13", "accelerate>=1.0", "matplotlib>=3.7",
                "ray>=2.40", "vermin>=1.6", "s3fs>=2024.6", "moto[server]>=5.1", "boto3>=1.34"],
    },
    entry_points={"console_scripts": ["batchcap=batchcap.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: MIT License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
