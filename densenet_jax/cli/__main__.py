"""``python -m densenet_jax.cli``: the ``densenet-jax`` command."""

from densenet_jax.cli import main

if __name__ == "__main__":
    main()
