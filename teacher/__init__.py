"""The LLM teacher: a headless decoder read as a dense retriever (LLaRA/iLoRA input side).

backbone.py  load a Hugging Face decoder without its LM head (folder or GGUF, cached)
prompt.py    the hybrid prompt: `title [HistoryEmb]` per history item
moe_lora.py  iLoRA's instance-wise mixture of LoRA experts on stock peft
model.py     the retriever: projectors, gate, item table, `get_teacher_outputs`
train.py     contrastive training with early stopping
infer.py     DeepSpeed / transformers inference into the teacher cache
"""
