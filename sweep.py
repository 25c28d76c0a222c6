"""Train and log PNN runs: ``python sweep.py`` runs the eight README experiments.

Every invocation is a Hydra multirun (see conf/config.yaml): one MLflow parent run, one child
run per job. Examples::

    python sweep.py                                        # the eight experiments
    python sweep.py experiment=e6_pnn_unique_masks_mix_maps
    python sweep.py 'experiment=glob(e*)' train.seed=1,2,3
    python sweep.py experiment=e7_pnn_shared_masks masks.nmasks=1,8,64
    python sweep.py profile=smoke                          # offline, minutes on a CPU
    python sweep.py experiment=e6_pnn_unique_masks_mix_maps dry_run=true
"""

from typing import Any

import hydra
from omegaconf import DictConfig

from pnn.config import register_schema
from pnn.shutdown import skip_exit_collection

skip_exit_collection()
register_schema()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> Any:
    import torch

    from pnn.sweep.job import run

    # Fixed by the config, never by how many jobs run side by side: on the CPU the thread count
    # changes the order of floating-point sums, hence the numbers.
    torch.set_num_threads(cfg.train.threads)
    return run(cfg)


if __name__ == "__main__":
    main()
