"""The special tokens of the published tokenizer: their strings and ids, defined once.

Every tokenizer the recipe trains (and the published one) has these 16 tokens first, at ids
0..15, so ``<mask>`` is id 4 in every model folder dual-lm reads or writes.
"""

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<mask>"] + [f"<special_{i}>" for i in range(11)]
NUM_SPECIAL_TOKENS = len(SPECIAL_TOKENS)
UNK_ID, BOS_ID, EOS_ID, PAD_ID, MASK_ID = (SPECIAL_TOKENS.index(t) for t in ("<unk>", "<s>", "</s>", "<pad>", "<mask>"))
# The transformers tokenizer attributes that name them.
ROLE_TOKENS = {
    "unk_token": "<unk>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "mask_token": "<mask>",
}
