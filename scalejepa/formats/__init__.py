"""Encoder weights in other libraries' layouts, each as a directory with a safetensors
file: our own names with the sidecar in the metadata (:mod:`.safetensors_file`), Hugging
Face transformers' ``IJepaModel`` (:mod:`.hf_dir`), timm's ``VisionTransformer``
(:mod:`.timm_dir`), and the model card every export carries (:mod:`.model_card`).
Writing needs only ``safetensors``; the tests load each layout in its real library."""

# Files of an export directory besides each layout's own.
PT_FILE = "model.pt"  # --format pt: the plain state dict, its sidecar model.json next to it
CARD_FILE = "README.md"
