"""One training run and everything only training needs: ``run`` (options -> checked config -> model, class images,
data, run folder, Lightning ``Trainer``; what ``main.py``, notebooks and the web UI call), ``config`` (every key
and value of a training config checked), ``callbacks`` (run folder, save-on-interrupt, caches, grids, exports),
``validation`` (the paper's metrics during training, ``best.ckpt``) and ``class_images`` (prior images on demand).
The top of the library below the web UI: it may import every other package, and none imports it.
"""
