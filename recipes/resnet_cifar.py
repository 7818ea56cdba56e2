"""ResNets on CIFAR (or the embedded synthetic data) with the lt_theory callbacks, from a YAML config.

    python recipes/resnet_cifar.py fit --config recipes/configs/quickstart.yaml
    python recipes/resnet_cifar.py fit --config recipes/configs/resnet20_cifar10.yaml --data.init_args.root /data
    python recipes/resnet_cifar.py fit --config ... --ckpt_path last      # resume a preempted run

See ``python recipes/resnet_cifar.py fit --help`` for every option.
"""

from lt_theory.cli import main

if __name__ == "__main__":
    main()
