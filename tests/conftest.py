import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE trained in-process on real text (the stdlib sources), as nanochat's tests do."""
    import pathlib
    import sysconfig

    from quark.tokenizer import train_tokenizer

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))[:60]]
    texts += ["Ciao, come stai? Però è già così: perché la città è bella.", "Hello world! 12345 + 678 = 13023"] * 50
    return train_tokenizer(texts, vocab_size=512, show_progress=False)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
