"""Classify images with converted torchvision weights.

    python convert/torch_to_flax.py densenet121-a639ec97.pth densenet121.safetensors
    python examples/classify.py densenet121.safetensors cat.jpg photos/

Preprocessing is torchvision's (resize 256, centre crop 224, ImageNet mean/std), so a converted
torchvision checkpoint gives torchvision's predictions. (``densenet-jax predict`` does the same.)
"""

import argparse

import densenet_jax as dj


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="a densenet_jax .safetensors")
    parser.add_argument("images", nargs="+", help="image files or folders")
    args = parser.parse_args()

    model = dj.load(args.weights)
    for result in dj.predict(model, args.images, top_k=5):
        print(result["file"])
        if "skipped" in result:  # an unreadable image, with the reason
            print(f"  skipped: {result['skipped']}")
        for entry in result.get("top", []):
            print(f"  {entry['probability']:6.1%}  {entry['name']}")


if __name__ == "__main__":
    main()
