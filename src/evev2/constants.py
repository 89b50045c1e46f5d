"""Ids shared by the data pipeline and the model: one home, so that neither has to import the other."""

#: Label of the positions that carry no loss (PyTorch cross-entropy's `ignore_index`).
IGNORE_INDEX = -100
#: Placeholder id of one whole image in `input_ids`, as in the official code; `EVEConfig.image_token_index` defaults to it.
IMAGE_TOKEN_INDEX = -200
