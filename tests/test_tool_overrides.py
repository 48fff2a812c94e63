"""The command lines of the tools that take list options and trailing KEY VALUE config overrides
(ddl_mask2former.config.split_config_overrides): the first config key ends the lists."""
import pytest

from tool_helpers import load_tool


@pytest.mark.parametrize("tool, argv, overrides", [
    ("cross_generator", ["--out", "o", "--stages", "train", "evaluate", "INPUT.DEGRADATION.ENABLED", "True"],
     ["INPUT.DEGRADATION.ENABLED", "True"]),
    ("quickstart", ["--generator", "varied", "--chains", "jpeg", "none", "OUTPUT_DIR", "RUN_1", "SEED", "3"],
     ["OUTPUT_DIR", "RUN_1", "SEED", "3"]),
    ("robustness", ["--config-file", "c.yaml", "--split", "s", "--output", "RUN_1", "--levels", "jpeg:90",
                    "MODEL.WEIGHTS", "w.pth"], ["MODEL.WEIGHTS", "w.pth"]),
])
def test_list_options_end_at_the_first_config_key(tool, argv, overrides):
    """A list option (--stages, --chains, --levels) does not swallow the overrides after it, and an
    upper-case option value that is no config key (RUN_1) stays an option value."""
    args = load_tool(tool).parse_args(argv)
    assert args.opts == overrides
    if tool == "cross_generator":
        assert args.stages == ["train", "evaluate"]
    elif tool == "quickstart":
        assert args.chains == ["jpeg", "none"]
    else:
        assert args.levels == ["jpeg:90"] and args.output == "RUN_1"
