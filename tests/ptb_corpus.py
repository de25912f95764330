"""Tricky one-line captions for comparing cider.tokenize with the Java PTB tokenizer.

Each group targets one rule of Stanford's PTBTokenizer (CoreNLP 3.4.1, the
jar coco-caption ships). Invisible characters are written as escapes. No
line contains a line break of any kind: those are p2_evaluate.py's business
(Java splits the line there, see its _LINE_BREAKS).
"""

FRACTIONS = [
    "3\u00bd cups of flour",
    "a 2\u00bc inch pipe and \u00be of a pie",
    "\u2153 of the cake and \u2154 of the pie",
    "\u215b \u215c \u215d \u215e \u2155 of a pizza",
    "3 1/2 cups",
    "1/2 a sandwich",
    "10-3/4 inch",
    "a 12345/6 ratio",
    "3\u20442 and 1\u2044 4",
    "\u00bd-price sale",
    "the \u00bdway mark",
]

SOFT_HYPHEN = [
    "a long\u00adword in the text",
    "soft\u00ad hyphen at the end\u00ad",
    "\u00ad leading soft hyphen",
    "a \u00ad b",
    "don\u00ad't stop",
    "well\u00ad-known fact",
    "12\u00ad345 people",
    "\u00ad\u00ad",
]

COMBINING = [
    "a cafe\u0301 on the corner",
    "a nai\u0308ve man and a re\u0301sume\u0301",
    "a\u0300 la carte",
    "\u0301 alone",
    "the man\u0303ana bus",
    "cafe\u0301's menu",
    "cafe\u0301-style seating",
    "a \u0915\u093f\u0924\u093e\u092c on the desk",
    "x\u20d7 vector arrow",
    "e\u0301.g. this",
]

UNDERSCORES = [
    "a _UNK sitting on a _UNK",
    "_unk _UNKNOWN",
    "a_b and a__b",
    "__init__ and _a and a_",
    "snake_case_name",
    "___",
    "2_3 and a_1",
    "_UNK's hat",
    "the_UNK",
]

TAGS = [
    "a <b>bold</b> word",
    "a <a href=\"x\">link</a> here",
    "a <br/> line <br> break",
    "<p> a paragraph </p>",
    "a<b and c>d",
    "x < y > z",
    "<!-- a comment -->",
    "<3 love",
    "a <1> b",
    "<unk> and <UNK>",
    "an <img src='a.jpg' alt=\"a dog\"> tag",
    "<<double>>",
    "a < b",
    "5 > 3",
    "&lt;b&gt; and &amp; and &quot;x&quot;",
    "AT&T and S&P",
    "a &mdash; dash and &nbsp; space",
]

QUOTES = [
    "a sign that says \"stop\"",
    "he said \"hi\" and left",
    "\"quoted\" start",
    "end \"quoted\"",
    "a \"1st\" place and \"$5\" deal",
    "' single quote",
    "the dogs' bowls",
    "'quoted' word",
    "''two single'' quotes",
    "``latex'' quotes",
    "\u2018curly\u2019 and \u201ccurly\u201d",
    "\u201elow\u201c and \u201b reversed",
    "\u00abguillemets\u00bb and \u2039single\u203a",
    "rock 'n' roll",
    "'90s fashion and '07",
    "y'all and ma'am",
    "o'clock and O'Brien and d'Artagnan",
    "it's the dog's and the dogs' toys",
    "we'll we've we'd I'm they're",
    "I can't won't shouldn't ain't",
    "'em and 'cause and 'til",
    "rock \u2019n\u2019 roll",
    "don\u2019t and it\u2019s",
]

BRACKETS = [
    "a dog (brown) on a mat",
    "a [red] car and a {blue} boat",
    "((nested)) brackets",
    "a ( b ) c",
    "(555) 123-4567",
    "smile :) and :-( faces",
    "x[0] and f(x)",
]

ELLIPSES = [
    "a dog...",
    "a dog . . . and a cat",
    "wait.... what",
    "and......",
    "a dog\u2026 and a cat\u2026",
    "..",
    "a. b. c.",
    "the end.",
    "the end..",
]

NUMBERS = [
    "1,000 people and 3.14 pies",
    "-5 degrees and +5 points",
    "3:30 pm and 12:00",
    "a 10-year-old boy",
    "1.5x zoom and 2x speed",
    "$5 and $5.99 and US$10",
    "50% off and 100 %",
    "#1 fan and #hashtag",
    "1st 2nd 3rd 4th",
    "12/25/2015 and 1-2-3",
    "v2.0 and 3.5.1",
    "1e10 and 0x1F",
    "7.",
    "no. 5 and No. 7",
    "\u00b2 and x\u00b2 and H\u2082O",
    "\u00a35 and \u20ac10 and \u00a5100 and \u00a2",
    "\u20b9100 rupees",
    "\u0665\u0666 arabic digits",
    "123-456-7890",
]

UNICODE_PUNCTUATION = [
    "a dog \u2014 a big one \u2013 barks",
    "a \u2010 b \u2011 c",
    "word\u2010word and word\u2011word",
    "\u00bfqu\u00e9? \u00a1s\u00ed!",
    "a \u2022 bullet \u00b7 dot",
    "a \u2020 dagger \u00a7 section \u00b6 pilcrow",
    "\u2122 and \u00a9 and \u00ae",
    "\u00b0 degrees and 30\u00b0C",
    "a\u00a0non-breaking space",
    "a\u2009thin\u3000space",
    "\u3002 and \uff0c fullwidth",
    "x \u00d7 y \u00f7 z",
    "\u2192 arrow and \u2264 leq",
    "a\u200bzero\u200dwidth\ufeffjoin",
    "\u2032 prime and \u2033 double prime",
    "tab\tseparated",
    "a \\ backslash | pipe",
    "a ~ tilde ^ caret",
    "a * star ** stars",
    "a = b + c",
    "@user and a@b.com",
    "@a_b @@a @1 #a #1 ##a a#b",
    "yahoo!mail and a?b and wow!",
    "US$5 and A$5 and a$5",
    "\x93cp1252\x94 \x91quotes\x92 \x96 \x85 \x80",
]

EMOJI = [
    "a dog \U0001f436 and a cat \U0001f431",
    "\U0001f600",
    "thumbs up \U0001f44d\U0001f3fd",
    "heart \u2764\ufe0f",
    "flag \U0001f1fa\U0001f1f8",
    "\u263a smile",
]

WORDS = [
    "Mr. Smith and Dr. Who at St. Paul's",
    "U.S.A. and e.g. and i.e.",
    "the U.S. flag",
    "a.m. and p.m.",
    "etc. and vs. and Inc.",
    "Jan. 5 and Sat. night",
    "gonna wanna gotta cannot",
    "lemme gimme",
    "c++ and c#",
    "e-mail and co-op and re-enter",
    "www.example.com and http://x.org/a?b=c",
    "CAPITALS AND MiXeD case",
    "\u00c9COLE \u0130stanbul \u00df",
    "na\u00efve r\u00e9sum\u00e9",
    "\u0391\u0392\u0393 greek and \u0430\u0431\u0432 cyrillic",
    "\u4e00\u4e2a\u72d7 chinese",
    "colour and harbour",
    "",
    "   ",
    ".",
    "!?!",
    "a-",
    "-a",
    "- - -",
    "a---b and a----b and a-----b",
]

CORPUS = (FRACTIONS + SOFT_HYPHEN + COMBINING + UNDERSCORES + TAGS + QUOTES + BRACKETS + ELLIPSES
          + NUMBERS + UNICODE_PUNCTUATION + EMOJI + WORDS)

# Lines of CORPUS whose tokens still differ from Java's, with Java's tokens
# (after -lowerCase). None is caption text a captioning model produces.
KNOWN_DIFFERENCES = {
    # Java's hyphenated-word rule is ASCII-only, and a combining accent is no letter
    "cafe\u0301-style seating": "cafe\u0301 - style seating",
    # inside 'n' Java keeps curly apostrophes as they are
    "rock \u2019n\u2019 roll": "rock \u2019n\u2019 roll",
    # American phone numbers are one token, brackets escaped inside
    "(555) 123-4567": "-lrb-555-rrb-\u00a0123-4567",
    # emoticons
    "smile :) and :-( faces": "smile :-rrb- and :--lrb- faces",
    # a letter-digit word stops at a period
    "v2.0 and 3.5.1": "v2 .0 and 3.5.1",
    # company abbreviations at the end of a line get a sentence period too
    "etc. and vs. and Inc.": "etc. and vs. and inc. .",
    "c++ and c#": "c++ and c#",
}
