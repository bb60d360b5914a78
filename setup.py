from setuptools import find_packages, setup

setup(
    name='mlae_jax',
    version='0.1.0',
    description='Masked LoRA Experts (MLAE) for Vision Transformers in JAX/Flax',
    packages=find_packages(include=['mlae_jax', 'mlae_jax.*']),
    package_data={'mlae_jax': ['assets/*.npz']},
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.4.35',
        'flax>=0.10',
        'optax>=0.2.3',
        'orbax-checkpoint>=0.6',
        'tensorflow-datasets>=4.9.4',
        # TFDS runs its input pipelines on TensorFlow; the CPU build suffices.
        'tensorflow-cpu>=2.16',
        'importlib_resources',  # etils (TFDS's download_and_prepare) needs it.
        'ml_collections>=0.1.1',
        'tensorboard',  # TensorBoard event files (flax.metrics.tensorboard).
        'absl-py',
        'numpy',
        'scipy',
        'tqdm',
        # The embedded demo's real data: scikit-learn's bundled handwritten digits.
        'scikit-learn',
        'matplotlib',  # The results tables' plot (python -m mlae_jax.sweeps.results).
    ],
    extras_require={
        # The PyTorch reference for the cross-checks (timm reads the original .npz).
        'test': ['pytest', 'torch==2.14.1', 'torchvision==0.29.1', 'timm>=1.0',
                 # The notebooks run top to bottom in CI (small mode).
                 'nbclient', 'nbformat', 'ipykernel'],
    },
)
