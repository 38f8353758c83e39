"""Shrinks an experiment config to a tiny run for the experiment-module tests."""


def shrink(config, tmp_path, *, num_sft: int = 128, num_pairs: int = 128, sft_steps: int = 8):
  """`config` with its run in `tmp_path`, tiny synthetic tasks and held-out prompts, a short SFT
  stage and small offline batches, every progress bar off; returns it."""
  config.run_dir = str(tmp_path / "run")
  config.data_dir = str(tmp_path / "data")
  config.verifiable.update(num_train=64, num_test=8)
  config.preference.update(num_sft=num_sft, num_pairs=num_pairs, num_test=16)
  config.eval.num_prompts = 16
  config.sft.loop.update(num_steps=sft_steps, batch_size=16, eval_every=0, checkpoint_every=0,
                         progress=False)
  config.sft.optimizer.warmup_steps = 1
  config.offline.loop.update(batch_size=16, progress=False)
  config.offline.optimizer.warmup_steps = 1
  return config
