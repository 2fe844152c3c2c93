"""Hard prompts: text prompt templates stored as small typed artifacts bound to a tokenizer.

`schema` (the config blob), `template` (UTF-8 text and `{name}` placeholders),
`tokenizer` (the tokenizer's identity and token counts), `package` (push, load).
Nothing here imports torch; counting tokens needs the `tokenizers` package.
"""
