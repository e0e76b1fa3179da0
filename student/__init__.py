"""The SASRec-style student: the model users serve, and the CF model the teacher reads."""
