"""anyo: distil LLM dense retrievers for sequential recommendation into SASRec students.

The shared pieces live here: the data protocol (`distill.data`), the FAISS
evaluation harness (`distill.harness`), recipes (`distill.config`), the teacher
cache (`distill.cache`), distillation losses (`distill.losses`) and the CLI.
"""

__version__ = "0.1.0"
