"""Regenerate the bundled sample images (deterministic drawings, no downloads):

    .venv/bin/python demo/samples/make_samples.py
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent


def vertical_gradient(w, h, top, bottom):
    t = np.linspace(0, 1, h)[:, None, None]
    return (np.array(top) * (1 - t) + np.array(bottom) * t).repeat(w, axis=1).astype(np.uint8)


def house(w=320, h=240):
    im = Image.fromarray(vertical_gradient(w, h, (90, 150, 230), (190, 220, 250)))
    d = ImageDraw.Draw(im)
    d.rectangle((0, int(h * 0.65), w, h), fill=(70, 150, 60))  # grass
    d.ellipse((w - 80, 20, w - 30, 70), fill=(250, 220, 60))  # sun
    d.rectangle((80, 110, 200, 180), fill=(180, 90, 60))  # walls
    d.polygon([(70, 110), (140, 60), (210, 110)], fill=(120, 40, 40))  # roof
    d.rectangle((125, 140, 155, 180), fill=(90, 60, 30))  # door
    return im


def beach(w=400, h=260):
    im = Image.fromarray(vertical_gradient(w, h, (120, 180, 240), (200, 230, 255)))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 120, w, 190), fill=(30, 100, 170))  # sea
    d.polygon([(0, 190), (w, 170), (w, h), (0, h)], fill=(230, 210, 160))  # sand
    d.ellipse((60, 40, 130, 70), fill=(250, 250, 250))  # cloud
    return im


def shapes(w=256, h=256):
    im = Image.new("RGB", (w, h), (128, 128, 128))
    d = ImageDraw.Draw(im)
    d.ellipse((20, 20, 110, 110), fill=(220, 30, 30))
    d.rectangle((140, 30, 230, 120), fill=(30, 60, 220))
    d.polygon([(60, 230), (128, 140), (196, 230)], fill=(240, 200, 20))
    return im


def street(w=300, h=200):
    im = Image.fromarray(vertical_gradient(w, h, (160, 170, 190), (200, 200, 210)))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 140, w, h), fill=(60, 60, 65))  # road
    d.rectangle((20, 40, 90, 140), fill=(150, 120, 100))  # building
    d.rectangle((200, 20, 280, 140), fill=(110, 110, 130))  # building
    d.rounded_rectangle((110, 115, 190, 150), radius=8, fill=(200, 30, 40))  # car
    d.ellipse((120, 140, 140, 160), fill=(20, 20, 20))
    d.ellipse((160, 140, 180, 160), fill=(20, 20, 20))
    return im


if __name__ == "__main__":
    house().save(HERE / "house.png", optimize=True)
    beach().save(HERE / "beach.jpg", quality=90)
    shapes().save(HERE / "shapes.png", optimize=True)
    street().save(HERE / "street.jpg", quality=90)
