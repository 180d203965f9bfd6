"""scikit-image's sample photos (shipped inside the package) as the ``photos`` and ``coco`` fixtures lay
them out (see conftest.py): which photo goes in which class, and the zero-shot templates."""

from __future__ import annotations

# zero-shot ImageFolder: 2-3 photos per class folder
PHOTOS = {
    "person": ["astronaut.png", "camera.png"],
    "cat": ["chelsea.png", "coffee.png"],
    "space": ["rocket.jpg", "moon.png", "hubble_deep_field.jpg"],
    "texture": ["brick.png", "grass.png", "gravel.png"],
}
TEMPLATES = ["a photo of a {c}.", "a blurry picture of the {c}."]
# COCO-style retrieval set: two captions per photo, built from its class name
COCO_PHOTOS = {
    "cat": ["chelsea.png", "coffee.png"],
    "person": ["astronaut.png", "camera.png"],
    "space": ["rocket.jpg"],
}
