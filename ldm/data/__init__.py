"""Training data: reading the user's photos (``image_loading``), the DreamBooth dataset of subject and class images
(``dreambooth``), aspect-ratio buckets, the resumable loader, the latent and text caches (``cache``), and the toy
world the shipped demo model learns. Imports the core helpers and the networks' distributions, nothing above.
"""
