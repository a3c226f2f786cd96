from densenet_jax.cli import main

main()
