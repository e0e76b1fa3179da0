"""The stages of a run, each a small module reading and writing artifacts under one run folder.

RUN/recipe.yaml       the resolved recipe of the last command (after --set)
RUN/split/            prepared leave-one-out split          prepare.py   (anyo prepare)
RUN/mostpop/          MostPop metrics                       mostpop.py   (anyo mostpop)
RUN/student_alone/    SASRec trained alone (the CF model)   student.py   (anyo student train)
RUN/teacher/          LLM retriever: adapter + heads        teacher.py   (anyo teacher train)
RUN/teacher_cache/    teacher top-K for training positions  infer.py     (anyo teacher infer)
RUN/student_distilled student trained from the cache        distill.py   (anyo distill)
RUN/report/           teacher vs student                    report.py    (anyo bench)

Each module has `inputs(...)`, the hashes its artifact records, and `run(...)`,
which returns the artifact's record and skips the work when the artifact on disk
was built from exactly those inputs.
"""
