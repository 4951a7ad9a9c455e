# The stand-alone commands, each `python -m commands.<name>`: plan (memory before a run), tune (the fastest
# configuration that fits), prepare (token files from your data), export (a checkpoint as a Hugging Face model
# or one file), sbatch (a ready SLURM script). They compose the same Hydra config as train.py and run jobs
# through launcher/, one floor below them: nothing under launcher/ imports a command.
