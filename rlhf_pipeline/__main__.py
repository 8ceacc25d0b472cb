from rlhf_pipeline.cli import main

main()
