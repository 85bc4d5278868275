"""The low-rank side: every target matrix's rank, then its factors.

    module.py      LowRankLinear, the two-factor layer a factorized matrix becomes
    spectrum.py    singular values and spectral metrics, one matrix at a time
    plan.py        RankPlan and the allocation policies (POLICIES: uniform, welore, energy, loss, minimax)
    factorize.py   the factorizers (FACTORIZERS: svd, whiten, asvd, kfac, fisher)
    calibrate.py   input statistics block by block on calibration windows (sequential or not)
    curvature.py   output-gradient statistics of the LM loss for the curvature-aware factorizers
    refit.py       least-squares refit of the factors to the dense outputs
    select.py      --method auto: the recipe chosen on held-back calibration windows
    compress.py    CompressConfig and the lowrank stage (low_rank_) that runs them over a model

`welore.compress_` (welore.recipe) runs the lowrank stage from a recipe.
"""
