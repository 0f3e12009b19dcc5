"""Entry points: pretrain, diff_configs, bench, demo."""
