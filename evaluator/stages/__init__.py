"""Code that runs inside a stage venv as `python -m evaluator.stages.<name> --job <job.json>`.

Never imports evaluator.daemon: stages talk to the daemon only through files and exit codes.
"""
