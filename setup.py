"""Install the suite so `import library` and `import networks` work from any folder."""

import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "requirements.txt"), encoding="utf-8") as handle:
    requirements = [line.strip() for line in handle if line.strip() and not line.startswith("#")]

setup(
    name="diffusion-trainer",
    version="0.1.0",
    description="Training suite for image diffusion models: LoRA, DreamBooth, fine-tuning, textual inversion",
    packages=find_packages(include=["library", "library.*", "networks", "networks.*", "finetune", "finetune.*"]),
    package_data={"finetune": ["clean_rules.toml"]},
    python_requires=">=3.10",
    install_requires=requirements,
    # everything the guides' commands use is in requirements.txt; these are the truly optional extras
    extras_require={
        "xformers": ["xformers"],
        "wandb": ["wandb"],
    },
)
