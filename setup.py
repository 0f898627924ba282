from setuptools import find_packages, setup

setup(
    name="rlhf_ds",
    version="0.1.0",
    description="Multi-node RLHF (SFT, reward model, PPO) on DeepSpeed ZeRO-3 with a portable hybrid engine",
    packages=find_packages(include=["rlhf_ds", "rlhf_ds.*"]),
    package_data={"rlhf_ds": ["ds_templates/*.json"]},
    python_requires=">=3.10",
    # Compatible ranges for installing into your own environment; the exact tested versions are requirements/lock.txt
    # (tests/test_pins.py checks that they satisfy these). torch is deliberately a loose lower bound: GPU users keep
    # the CUDA build they already have.
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.14",
        "transformers>=4.45",
        "tokenizers>=0.19",
        "peft>=0.11",
        "datasets>=2.19",
        "safetensors>=0.4",
        "wandb>=0.17",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.7",
        "numpy>=1.24",
        "psutil>=5.9",
        "pyarrow>=15",
    ],
    extras_require={"8bit": ["bitsandbytes>=0.43"], "test": ["pytest>=8", "packaging>=23", "bitsandbytes>=0.43"]},
    entry_points={"console_scripts": ["rlhf-ds=rlhf_ds.cli:entry"]},
)
