"""Data sets that ship offline: text for transformers (:mod:`osscar_opt.data.text`) and the
scikit-learn digits images with a small trainer for torchvision models (:mod:`osscar_opt.data.digits`)."""
