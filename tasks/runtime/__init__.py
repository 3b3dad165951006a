"""The stage runtime: what every stage task and every flow shares, below the stages themselves.

    stage.py      the stage-task decorator, Prefect cache policy and lock, and run_stage (folder, MLflow child run)
    stager.py     how flows call stage tasks (one key per call, stale artifacts recomputed, cache hits recorded)
    keys.py       cache keys: config + input content hashes + a fingerprint of the stage's code
    refs.py       ArtifactRef, the small JSON a stage returns, and the manifest that verifies a reuse
    paths.py      where a project's artifacts, stores and locks live
    locks.py      stage locks that a killed run cannot leave behind
    tracking.py   MLflow parent and child runs, cache-hit records, closing runs a dead process left open
    uptodate.py   the record of a flow's last complete run, and whether an unchanged re-run may just report it
    judging.py    the judge a config names

The registered MLflow model (logging, serving, promotion) is tasks/registry/.
"""
