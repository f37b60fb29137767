"""The settings the sft and rm stages share: the training flags plus where the preference pairs come from
(:mod:`distreward.data` loads them)."""
from dataclasses import dataclass, field

from distreward.data import EMBEDDED, embedded_task
from distreward.trainer_utils import TrainingConfig


@dataclass
class PreferenceTrainingConfig(TrainingConfig):
    """Training settings plus where the preference pairs come from (shared by the sft and rm stages)."""

    dataset_name: str = field(default=EMBEDDED, metadata={
        "help": "'embedded' (the generated task), a local .jsonl/.parquet file or a hub id "
                "(e.g. esfrankel17/HelpSteer2_binarized) in the HelpSteer2_binarized schema."})
    dataset_split: str = field(default="average_rating_split", metadata={
        "help": "Split to load from a hub data set (ignored for 'embedded' and local files)."})
    task: str = field(default="v2", metadata={
        "help": "Embedded task: v2 (demonstrations, a rater panel, regions; docs/testbed.md) or v1 (the first task)."})
    num_pairs: int = field(default=4000, metadata={"help": "Pairs of the embedded task to generate."})
    max_length: int = field(default=256, metadata={"help": "Conversations (a pair's sides) longer than this "
                                                           "many tokens are dropped."})

    def __post_init__(self) -> None:
        super().__post_init__()
        embedded_task(self.task)
        if self.num_pairs < 1 or self.max_length < 1:
            raise ValueError(f"--num_pairs and --max_length must be >= 1, got {self.num_pairs} and {self.max_length}")
