"""The read side: what a job looks like from outside, for people and for Flower.

queries.py    every query (counts, status, export rows, batches, latencies); plain functions over a Session
export.py     `tubesum export`: CSV / JSON Lines files
status.py     `tubesum status`: rich tables
progress.py   the live bars of `submit --wait` and `run`
report.py     `tubesum report`: batches.csv and plots
task_labels.py  what Flower shows of a task (its arguments and result)

Nothing here writes to the database. Imports stay in the submodules: a worker that needs a task's
label does not load rich or matplotlib.
"""
