"""`python -m trainer.distill_draft`: fit a draft to an actor, offline (`trainer.draft.cli`)."""
from trainer.draft.cli import main

if __name__ == "__main__":
    main()
