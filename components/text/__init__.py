"""The text encoder tau_theta of text-conditioned generation (issue 17): a word tokenizer built from the
training captions, a small transformer trained jointly with the DiT, or a frozen local CLIP/T5 text tower."""
