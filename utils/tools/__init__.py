"""What a person runs, on top of the library in `utils/` and `models/`: each module here is a command-line tool
(`python -m utils.tools.NAME --help`). Nothing in the library imports this package (tests/test_docs.py checks).

    study           the routing and trade-off studies: rows x seeds, trained, evaluated, attacked, one table
    report          one table (and curves) from run folders and sweep manifests
    flops           GFLOPs per image of dense and MoE models and of one training step
    benchmark       speed and memory of the MoE against its dense twins, measured side by side
    prepare_data    TinyImageNet / ImageNet folders in the layout the loaders read
    weights_digest  digests of fixed-seed runs: a refactoring must leave them unchanged
"""
