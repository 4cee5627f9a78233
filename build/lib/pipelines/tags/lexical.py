"""Offline tag-candidate extraction from comments: tokens, n-grams, counts, a rule classifier.

Everything here is a heuristic stand-in for the paper's GPT-4 extraction, chosen to need no
model download and to be deterministic:

- **Tokenisation** lower-cases, strips accents, keeps alphabetic runs (with apostrophes),
  drops a possessive ``'s`` and singularises every non-stopword with a few suffix rules
  (:func:`singularize`); it does not know parts of speech.
- **Phrases**: multiword aesthetic terms from :data:`ATTRIBUTE_PHRASES` ("depth of field",
  "rule of thirds") are merged into one token first, so that "field" is not counted for every
  "depth of field". Such a phrase counts as one token towards ``max_ngram``.
- **Candidates** are n-grams (n <= ``max_ngram``) whose first and last tokens are content
  words (alphabetic, >= 3 letters, not a stopword); inner tokens may also be the connectors
  "of" / "and" ("cup of coffee", "black and white"). Numbers and tokens with digits are never
  candidates.
- **Counts** are document frequencies: the number of comments that contain the n-gram at
  least once, so one long comment repeating a word cannot push it over ``min_count``.
- **Adverbs and modifiers**: 6+ letter words ending in "-ly" (except :data:`LY_NOUNS`) are
  never counted, and a semantic candidate may not end in a word that looks like an adjective
  or participle by its suffix (:func:`looks_like_modifier`).
- **Classification** (:func:`classify`) calls a candidate an *attribute* when any of its
  tokens starts with a stem of the small hand-written lexicon :data:`ATTRIBUTE_STEMS`
  (optionally after a prefix such as "over"/"under") or is an attribute phrase; everything
  else is *semantic*. So "sharp focus" and "tilted horizon" are attributes, "coffee cup" is
  semantic, and "street light" is (wrongly) an attribute: mixed phrases go to attribute.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Mapping, Sequence

STOPWORDS: frozenset[str] = frozenset(
    """
    a about above after again against all almost along already also although always am among an
    and another any anyone anything anyway are aren't around as at away back be became because
    become been before being below beside besides between beyond both but by can cannot can't
    could couldn't did didn't do does doesn't doing done don't down during each either else
    enough especially etc even ever every everyone everything except few for from further get
    gets getting got gotten had hadn't has hasn't have haven't having he her here hers herself
    him himself his how however i if in instead into is isn't it its itself just least less let
    lets may me might mine more most much must my myself neither never no nobody none nor not
    nothing now of off often on once one ones only onto or other others otherwise our ours
    ourselves out over own per perhaps quite rather really same several shall she should
    shouldn't since so some somehow someone something sometimes somewhat somewhere still such
    than that that's the their theirs them themselves then there there's these they this those
    though through throughout thus to too toward towards under until up upon us very via was
    wasn't we well were weren't what whatever when where whether which while who whole whom whose
    why will with within without won't would wouldn't yet you your yours yourself yourselves
    im ive id dont didnt doesnt isnt cant wont youre youve thats theres
    able add added agree bit come came comment feel felt find found give gave given go goes going
    gone help hope keep kind know let like liked likes little lot look looked looking looks make
    makes making made many maybe mean need needs thing think thought try tried use used using
    want way work worked works see seeing seem seemed seems seen saw say said show shows take
    takes taken took tell time put lol wow yes yeah ok okay thank thanks please
    good better best bad great nice nicely lovely love loved beautiful beautifully wonderful
    awesome amazing excellent cool fantastic gorgeous pretty perfect perfectly stunning
    interesting fine job congrats congratulations
    first second third two three four five left right top bottom side part area point sure
    actually definitely probably certainly simply totally truly absolutely exactly
    appear appears bring brings create creates created captured case different difficult
    easy fact far fit general hard high higher issue lack large low lower main meet overall
    place possible problem result slightly small sense sorry stand stop strong wish imo btw
    cute funny clever fun favorite favourite glad happy wonder lucky luck enjoy enjoyed
    big old new young short long tall dead lost particular unique unusual obvious minor major
    proper wrong worth worthy potential personal tough poor due next end sort course reason
    example type aspect factor change effort mind win guess bet kinda imho omg ten half
    whenever wherever anymore alot kindof sorta till til sic teh shouldnt wouldnt couldnt arent
    wasnt werent hasnt havent youll theyre last
    """.split()
)
"""Function words plus comment filler (verbs of opinion, praise, position words). Heuristic."""

LY_NOUNS: frozenset[str] = frozenset(
    """anomaly assembly belly bully butterfly dragonfly family firefly folly gully holly italy jelly
    july lily monopoly rally supply""".split()
)
"""Nouns that end in -ly; other 5+ letter -ly words are taken for adverbs ("sadly", "badly")
and never counted."""

CONNECTORS: frozenset[str] = frozenset({"of", "and"})
"""Stopwords allowed *inside* an n-gram ("cup of coffee", "black and white")."""

ATTRIBUTE_STEMS: tuple[str, ...] = tuple(
    """
    aberration abstract angle aperture artefact artifact artistic atmospher backdrop background
    backlit balanc blown blur bokeh bright burn busy calm candid centered centering centred
    chromatic clarity clean clear clipp clutter color colour compos compress contrast creativ
    crisp crooked crop curve dark decisive depth detail diagonal dim distort distract dof dramat
    dreamy dull dynamic edge edit effect emotion execution expos feeling filter flare flash flat
    focal focus foreground frame framing fring fuzzy geometr glare glow gradient grain harsh
    haze hazy hdr highlight horizon horizontal hue impact iso lens level light macro minimal
    monochrom mood motion muddy mute negative noise noisy orientation originality palette
    panning pastel pattern perspective pixel placement portrait pose posing process proportion
    quality reflection repetition resolution saturat scale serene shadow shallow shape sharp
    shutter silhouett simple simplic soft space speed straight style symmetr technical telephoto
    texture tilt timing tonal tone toning vantage vertical vibran viewpoint vignet vivid warm
    washed wide zoom
    aesthetic appeal appetiz artsy average awkward bland bold boring charm cheerful chaotic
    circular classic curv decent delectab delicate delicious depress dizz disorient dreamy eerie
    elegan emotive energetic ethereal evocative gloom glossy graceful gritty grung haunting
    intimate intrigu joyful lively lovel matte mediocre melanchol messy monoton moody mysterious
    mystique nostalgi painterly peaceful playful pleasant pleasing powerful pretti retro
    romantic rough serenity shiny silky smooth somber spooky spontaneous stiff striking subtle
    surreal sweet tasty tension tragic tranquil vintage whimsical yummy
    acceptab adequa competent mouthwater superb terrific spectacular
    translucen transparen uniform
    black white red green blue yellow orange purple pink brown grey gray cyan magenta teal
    golden silver violet sepia monochrome turquoise amber crimson beige tint
    """.split()
)
"""Stems of aesthetic-attribute words, matched as token prefixes: technique and composition,
light, colour (the colour names), texture and shape, mood, and the evaluative words of photo
critique ("bland", "striking", "acceptable"). Heuristic and incomplete."""

META_WORDS: frozenset[str] = frozenset(
    """
    photo photograph photography photographer pic picture image shot snap snapshot entry
    challenge dpc dpchallenge vote voter voting score scoring ribbon contender winner submission
    title subject matter impression idea choice opinion viewer critique criticism comment
    suggestion attempt version series concept theme topic element interest attention success
    taste rendition treatment description demonstration standpoint word amount stuff rest
    couple tad plus com www http kenrockwell camera software histogram monopod tripod photoshop
    skill vision intention insight judgement judgment flair effort job try work
    """.split()
)
GENERIC_NOUNS: frozenset[str] = frozenset(
    """
    setting mode system range combination variety mix number quantity degree level amount
    portion section region aspect feature factor item sort kind type way thing lot use lack
    sense part side piece bit area spot place position direction balance basis input output
    name date list rule hint glimpse touch inch foot meter size length width height distance
    time moment day year hour minute second while instance case example reason purpose result
    effect problem issue question answer point fact detail step process method approach
    """.split()
)
"""Abstract nouns of critique talk ("colour combination", "exposure mode"): not content. Alone
they are no tag; with a quality modifier, the phrase is an attribute. Heuristic."""

ABSTRACT_SUFFIXES: tuple[str, ...] = ("tion", "sion", "ment", "ity", "ance", "ence", "ism", "ship", "hood", "est")
"""Suffixes of abstract nouns ("inclusion", "judgement", "resemblance") and superlatives
("hardest"): such a word is not content (except :data:`CONCRETE_EXCEPTIONS`)."""

CONCRETE_EXCEPTIONS: frozenset[str] = frozenset(
    """
    station potion lotion ornament monument instrument garment pavement apartment basement cement
    tournament ambulance audience residence city forest chest nest crest vest harvest ship
    friendship fence entrance
    """.split()
)

"""Words about the photo as an entry, the contest, the critic or the photographer's tools:
neither content nor a quality of the picture. A candidate with one of them as its head is not
a tag unless a quality word modifies it ("striking image" is an attribute). Heuristic."""

DETERMINERS: frozenset[str] = frozenset(
    "a an the this that these those his her their its my your our some each every no any another".split()
)
INTENSIFIERS: frozenset[str] = frozenset(
    """very too so quite rather bit slightly somewhat extremely really pretty more less most
    overly fairly kinda incredibly little as is are was were be been being look looks looked
    looking seem seems seemed feel feels felt appear appears appeared become becomes stay remain
    remains get gets getting got""".split()
)
VERB_CUES: frozenset[str] = frozenset(
    """to would could should will can might must i you we they don't didn't doesn't cannot can't
    won't wouldn't couldn't shouldn't dont didnt cant wont please""".split()
)
"""Context words: before a noun (determiners), an adjective (intensifiers and copulas: "too
dark", "looks soft") or a verb ("to capture", "you could")."""

ATTRIBUTE_WORDS: frozenset[str] = frozenset(
    {"lit", "backlit", "sidelit", "unlit", "cast", "pop", "line", "center", "centre"}
)
"""Attribute words matched whole, not as prefixes ("lit" would catch "literally", "line" "linen")."""

ATTRIBUTE_PREFIXES: tuple[str, ...] = ("", "over", "under", "un", "de", "re", "well", "back", "mis", "mid")
"""Prefixes allowed before a stem ("overexposed", "unsharp", "defocus", "backlight")."""

NOT_ATTRIBUTE: frozenset[str] = frozenset(
    """
    lighthouse lightning lightbulb lighter lightweight flatbread flatware colony colon spaceship
    edgar speedboat delight delightful
    """.split()
)
"""Words that start with an attribute stem but usually name a thing. Heuristic."""

ATTRIBUTE_PHRASES: tuple[str, ...] = (
    "black and white",
    "color cast",
    "colour cast",
    "depth of field",
    "dynamic range",
    "focal length",
    "focal point",
    "golden hour",
    "leading line",
    "long exposure",
    "motion blur",
    "negative space",
    "point of view",
    "post processing",
    "rule of thirds",
    "shutter speed",
    "white balance",
)
"""Multiword attribute terms, in normalised form; merged into one token before counting."""

_SINGULAR_EXCEPTIONS: dict[str, str] = {
    "children": "child", "men": "man", "women": "woman", "people": "people", "feet": "foot",
    "teeth": "tooth", "mice": "mouse", "geese": "goose", "leaves": "leaf", "knives": "knife",
    "wolves": "wolf", "lives": "life", "wives": "wife", "shelves": "shelf", "loaves": "loaf",
    "halves": "half", "calves": "calf", "lenses": "lens", "buses": "bus", "series": "series",
    "species": "species", "news": "news", "thirds": "thirds", "clothes": "clothes",
    "tomatoes": "tomato", "potatoes": "potato", "heroes": "hero", "mangoes": "mango",
    "cookies": "cookie", "movies": "movie", "pies": "pie", "ties": "tie", "lies": "lie",
    "canvas": "canvas", "christmas": "christmas", "texas": "texas", "atlas": "atlas",
    "lens": "lens", "chaos": "chaos", "bokeh": "bokeh", "glasses": "glass", "always": "always",
    "physics": "physics", "mathematics": "mathematics", "analysis": "analysis", "axes": "axis",
    "crises": "crisis", "bonus": "bonus", "yes": "yes", "gas": "gas", "this": "this",
    "bias": "bias", "alias": "alias", "vegas": "vegas", "pancreas": "pancreas",
}

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)*")
_ARTICLES = frozenset({"a", "an", "the"})


def singularize(word: str) -> str:
    """Map a plural noun to its singular with a few suffix rules ("berries" -> "berry").

    Heuristic: it also strips the -s of verbs ("gives" -> "give") and has an exception list for
    words the rules get wrong; it is idempotent (``singularize(singularize(w)) == singularize(w)``).
    """
    if word in _SINGULAR_EXCEPTIONS:
        return _SINGULAR_EXCEPTIONS[word]
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is", "ous")):
        return word
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    return word[:-1]


_singular_cached = functools.lru_cache(maxsize=65536)(singularize)


def tokenize(text: str) -> list[str]:
    """Lower-cased, accent-free word tokens; non-stopwords singularised, possessive 's dropped."""
    text = text.replace("\u2019", "'")
    if not text.isascii():
        text = unicodedata.normalize("NFKD", text)
        text = "".join(ch for ch in text if not unicodedata.combining(ch))
    tokens = []
    for tok in _TOKEN_RE.findall(text.lower()):
        if tok.endswith("'s"):
            tok = tok[:-2]
        if tok not in STOPWORDS:
            tok = _singular_cached(tok)
        tokens.append(tok)
    return tokens


def merge_phrases(tokens: Sequence[str], phrases: Iterable[str] = ATTRIBUTE_PHRASES) -> list[str]:
    """Replace every occurrence of a known phrase by one token holding the phrase (greedy, longest first)."""
    by_first = _phrase_table(tuple(phrases))
    out: list[str] = []
    i = 0
    while i < len(tokens):
        for words in by_first.get(tokens[i], ()):
            if tuple(tokens[i : i + len(words)]) == words:
                out.append(" ".join(words))
                i += len(words)
                break
        else:
            out.append(tokens[i])
            i += 1
    return out


@functools.lru_cache(maxsize=8)
def _phrase_table(phrases: tuple[str, ...]) -> dict[str, list[tuple[str, ...]]]:
    """Phrases as word tuples, grouped by first word, longest first."""
    table: dict[str, list[tuple[str, ...]]] = {}
    for phrase in sorted(phrases, key=lambda p: (-len(p.split()), p)):
        words = tuple(phrase.split())
        table.setdefault(words[0], []).append(words)
    return table


def normalize_tag(tag: str) -> str:
    """The canonical form of a tag: tokenised as comments are, leading articles dropped.

    ``normalize_tag("The Coffee Cups")`` is ``"coffee cup"``. British and American spellings
    are left as they are ("colour" and "color" stay two tags). Returns "" for an empty tag.
    """
    tokens = tokenize(tag)
    while tokens and tokens[0] in _ARTICLES:
        tokens = tokens[1:]
    return " ".join(tokens)


def comment_tokens(text: str) -> list[str]:
    """Tokens of a comment as the extractor counts them (phrases merged)."""
    return merge_phrases(tokenize(text))


def is_content(token: str) -> bool:
    """A token that may start or end a candidate: a known phrase, or a 3+ letter non-stopword."""
    if " " in token:
        return True
    if len(token) >= 5 and token.endswith("ly") and token not in LY_NOUNS:
        return False  # an adverb ("unfortunately"), heuristic
    return len(token) >= 3 and token.isalpha() and token not in STOPWORDS


def candidate_ngrams(tokens: Sequence[str], max_n: int) -> Iterator[str]:
    """Candidate n-grams (1 <= n <= ``max_n``) of one token list, see the module docstring."""
    for i, first in enumerate(tokens):
        if not is_content(first):
            continue
        for n in range(1, max_n + 1):
            if i + n > len(tokens):
                break
            last = tokens[i + n - 1]
            if n > 1 and not (is_content(last) or last in CONNECTORS):
                break
            if is_content(last):
                yield " ".join(tokens[i : i + n])


def is_attribute(tag: str) -> bool:
    """Whether a normalised tag contains an aesthetic-attribute word or phrase (lexicon rule)."""
    padded = f" {tag} "
    if any(f" {phrase} " in padded for phrase in ATTRIBUTE_PHRASES):
        return True
    return any(_is_attribute_word(word) for word in tag.split())


def looks_like_modifier(word: str) -> bool:
    """Whether a word looks like an adjective or participle by its suffix ("enhanced", "famous",
    "colourful", "pointless"). Heuristic; used to keep such words from ending a semantic tag."""
    if word.endswith("ed"):
        return len(word) >= 5 and not word.endswith("eed")
    return word.endswith(("ous", "ful", "less", "ive", "able", "ible"))


@dataclass(frozen=True)
class WordContext:
    """How a word is used in the corpus: occurrences, and how many of them sit where a noun
    ends a noun phrase ("the tree is", "a red barn"), where an adjective stands ("too dark",
    "looks soft"), or where a verb follows its cue ("to capture", "you could")."""

    n: int = 0
    noun: int = 0
    adj: int = 0
    verb: int = 0

    @property
    def nounish(self) -> bool:
        """Used as a noun: at least 15 % noun contexts and more than adjective or verb contexts;
        or, never used as an adjective or verb, 2 noun contexts or fewer than 10 uses."""
        if self.adj or self.verb:
            return self.noun >= 0.15 * self.n and self.noun > self.adj and self.noun > self.verb
        return self.noun >= 2 or self.n < 10  # mass nouns rarely take an article; few uses: no evidence against

    @property
    def adjectival(self) -> bool:
        return self.n > 0 and self.adj >= 0.1 * self.n and self.adj >= self.noun and self.adj > self.verb


def word_contexts(token_lists: Iterable[Sequence[str]], words: Iterable[str] | None = None) -> dict[str, WordContext]:
    """:class:`WordContext` of every content word (or of ``words``) over tokenised comments."""
    wanted = None if words is None else set(words)
    acc: dict[str, list[int]] = {}
    for tokens in token_lists:
        m = len(tokens)
        for i, w in enumerate(tokens):
            if (wanted is not None and w not in wanted) or not is_content(w):
                continue
            c = acc.setdefault(w, [0, 0, 0, 0])
            c[0] += 1
            prev = tokens[i - 1] if i else ""
            ends = i + 1 == m or not is_content(tokens[i + 1])
            if ends and (prev in DETERMINERS or (i >= 2 and tokens[i - 2] in DETERMINERS and is_content(prev))):
                c[1] += 1
            if ends and prev in INTENSIFIERS:
                c[2] += 1
            if prev in VERB_CUES:
                c[3] += 1
    return {w: WordContext(*c) for w, c in acc.items()}


def word_kind(word: str, ctx: WordContext | None = None) -> str | None:
    """``"attribute"``, ``"meta"``, ``"semantic"`` or ``None`` (not a tag) for one token.

    Lexicons first (attribute phrases and stems, :data:`META_WORDS`); then, without corpus
    context, any other word counts as semantic (the old rule). With its :class:`WordContext`,
    a word is semantic only when the corpus uses it as a noun and it does not look like a
    participle or adjective by its suffix; an adjective-like word is an attribute only through
    the lexicon; verbs, adverbs and everything else are not tags.
    """
    if " " in word:  # a merged attribute phrase
        return "attribute"
    if not is_content(word):
        return None
    if _is_attribute_word(word):
        return "attribute"
    if word in META_WORDS or word in GENERIC_NOUNS:
        return "meta"
    if word.endswith("ness") and len(word) > 6:
        return "attribute"  # a quality noun: "softness", "emptiness"
    if word.endswith(ABSTRACT_SUFFIXES) and len(word) > 5 and word not in CONCRETE_EXCEPTIONS:
        return None
    if ctx is None:
        return "semantic"
    if looks_like_modifier(word) or (word.endswith("ing") and ctx.noun < 0.3 * ctx.n):
        return None
    return "semantic" if ctx.nounish else None


def classify(tag: str, contexts: Mapping[str, WordContext] | None = None) -> str | None:
    """``"semantic"``, ``"attribute"`` or ``None`` (neither) for a normalised tag.

    A one-word tag takes its word's kind (:func:`word_kind`; "meta" words are not tags). A
    longer tag is read by its head, the last word: a quality head makes an attribute ("sharp
    focus", "dark background"); a content head a semantic tag, whatever its modifier ("blue
    sky", "wine glass"), unless the modifier is a meta word; a meta head is an attribute when a
    quality word modifies it ("striking image") and no tag otherwise ("main subject", "average
    entry"). ``contexts`` (from :func:`word_contexts`) is the corpus evidence; without it every
    non-lexicon word counts as content, as before.
    """
    tokens = merge_phrases(tag.split())
    kinds = [word_kind(t, None if contexts is None else contexts.get(t, WordContext())) for t in tokens]
    head, mods = kinds[-1], kinds[:-1]
    if len(tokens) == 1:
        return head if head in ("semantic", "attribute") else None
    if head == "attribute":
        return "attribute"
    if head == "semantic":
        return None if "meta" in mods else "semantic"
    if head == "meta":
        return "attribute" if "attribute" in mods else None
    return None


_ATTRIBUTE_RE = re.compile(
    "(?:" + "|".join(p for p in ATTRIBUTE_PREFIXES if p) + ")?(?:" + "|".join(ATTRIBUTE_STEMS) + ")"
)


@functools.lru_cache(maxsize=65536)
def _is_attribute_word(word: str) -> bool:
    if word in ATTRIBUTE_WORDS:
        return True
    if word in NOT_ATTRIBUTE or word in STOPWORDS:
        return False
    return _ATTRIBUTE_RE.match(word) is not None


@dataclass
class LexicalResult:
    """Candidates kept by :func:`extract_lexical`, each with its document frequency."""

    semantic: Counter[str] = field(default_factory=Counter)
    attribute: Counter[str] = field(default_factory=Counter)
    n_comments: int = 0
    below_min_count: int = 0
    """Distinct candidates seen fewer than ``min_count`` times (dropped)."""
    not_semantic: int = 0
    """Frequent candidates that are neither content nor a quality (meta talk, verbs, adverbs,
    participles, other adjectives; dropped)."""


def count_candidates(token_lists: Iterable[Sequence[str]], max_n: int) -> tuple[Counter[str], int]:
    """Document frequency of every candidate n-gram, and the number of token lists read."""
    counts: Counter[str] = Counter()
    n = 0
    for tokens in token_lists:
        counts.update(set(candidate_ngrams(tokens, max_n)))
        n += 1
    return counts, n


def extract_lexical(
    token_lists: Iterable[Sequence[str]], *, min_count: int = 5, max_ngram: int = 3
) -> LexicalResult:
    """Count candidates over tokenised comments (:func:`comment_tokens`) and classify them.

    Keeps candidates that occur in at least ``min_count`` comments, classified by
    :func:`classify` with the corpus's own :func:`word_contexts` (how each word is used: as a
    noun, an adjective or a verb), so that content words go to *semantic*, quality words to
    *attribute*, and the rest (meta talk, verbs, adverbs, other adjectives) nowhere.
    """
    token_lists = list(token_lists)
    counts, n_comments = count_candidates(token_lists, max_ngram)
    frequent = {tag: count for tag, count in counts.items() if count >= min_count}
    contexts = word_contexts(token_lists, {w for tag in frequent for w in tag.split()})
    result = LexicalResult(n_comments=n_comments, below_min_count=len(counts) - len(frequent))
    for tag, count in frequent.items():
        kind = classify(tag, contexts)
        if kind is None:
            result.not_semantic += 1
        else:
            getattr(result, kind)[tag] = count
    return result


def document_frequency(token_lists: Iterable[Sequence[str]], tags: Iterable[str]) -> Counter[str]:
    """How many token lists contain each tag (any n-gram, stopwords included) at least once."""
    wanted = set(tags)
    if not wanted:
        return Counter()
    max_n = max(len(t.split()) for t in wanted)
    counts: Counter[str] = Counter()
    for tokens in token_lists:
        found = set()
        for i in range(len(tokens)):
            for n in range(1, max_n + 1):
                if i + n > len(tokens):
                    break
                gram = " ".join(tokens[i : i + n])
                if gram in wanted:
                    found.add(gram)
        counts.update(found)
    return counts
