"""Evaluation of a fine-tune on held-out samples: the metrics (``metrics``), which samples and their checks
(``heldout``), answers and loss (``predict``), one evaluation and the run's record of them
(``evaluator``), and the report page (``gallery``). ``visionft.job.evaluation`` runs it as a stage of a
training run.
"""
