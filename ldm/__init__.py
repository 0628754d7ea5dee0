"""DreamBooth for Stable Diffusion, in the layout of the original latent-diffusion code, grouped by job.

Layers, lowest first; a module imports its own layer and those below, never one above (``tests/test_architecture``
checks it, and that no two modules import each other in a circle):

core (``util``, ``files``, ``images``, ``config``, ``reference``) < ``families`` (what each model family is) <
``modules`` (the networks) < ``data`` < ``optim`` < ``weights`` (checkpoint files) < ``models`` (the Lightning
modules) < ``sampling`` < ``export`` < ``eval`` < ``training`` < ``webui``.
"""
