"""Word lists for the language task: country/language pairs and a filler vocabulary disjoint from them."""

from __future__ import annotations

# One language per country and no language twice, so the country alone decides the answer.
COUNTRY_LANGUAGE: tuple[tuple[str, str], ...] = (
    ("france", "french"),
    ("germany", "german"),
    ("spain", "spanish"),
    ("italy", "italian"),
    ("portugal", "portuguese"),
    ("greece", "greek"),
    ("turkey", "turkish"),
    ("russia", "russian"),
    ("poland", "polish"),
    ("sweden", "swedish"),
    ("norway", "norwegian"),
    ("denmark", "danish"),
    ("finland", "finnish"),
    ("netherlands", "dutch"),
    ("hungary", "hungarian"),
    ("japan", "japanese"),
    ("china", "mandarin"),
    ("korea", "korean"),
    ("vietnam", "vietnamese"),
    ("thailand", "thai"),
    ("indonesia", "indonesian"),
    ("iran", "persian"),
    ("israel", "hebrew"),
    ("egypt", "arabic"),
    ("kenya", "swahili"),
    ("ethiopia", "amharic"),
    ("india", "hindi"),
    ("pakistan", "urdu"),
    ("bangladesh", "bengali"),
    ("czechia", "czech"),
    ("romania", "romanian"),
    ("ukraine", "ukrainian"),
    ("iceland", "icelandic"),
    ("wales", "welsh"),
    ("armenia", "armenian"),
    ("georgia", "georgian"),
    ("mongolia", "mongolian"),
    ("nepal", "nepali"),
    ("croatia", "croatian"),
    ("bulgaria", "bulgarian"),
)

# The sentence frame, kept out of the fillers so "i grew up in" and "i speak fluent" are unambiguous cues.
FRAME_WORDS: tuple[str, ...] = ("i", "grew", "up", "in", ".", "speak", "fluent")

# Everyday words for the gap between the two halves of a sentence.
_FILLER_TEXT = """
    the a an and but or so because when while after before then later soon never always often sometimes
    we you they he she it my our your their his her its this that these those there here every each some
    many few most all both other another same such only just still even also very quite rather almost
    was were is are be been being have has had do does did will would can could should might must
    went came saw took gave made found kept left met read wrote ran walked worked lived played moved
    stayed visited watched learned taught cooked cleaned painted built fixed bought sold sent carried
    opened closed started finished helped called asked answered tried wanted needed liked loved hated
    remember remembered forgot think thought knew felt heard told said meant seemed looked turned
    house home school office street road city town village river lake sea mountain hill forest garden
    park field farm market shop station bridge church library museum hospital kitchen room window door
    table chair bed desk floor wall roof car bus train bike boat plane ticket letter book paper pen
    phone computer camera radio music song film picture story game ball dog cat horse bird fish cow
    bread cheese coffee tea milk water wine apple orange rice soup cake sugar salt butter egg meat
    morning evening night day week month year summer winter spring autumn weekend holiday birthday
    mother father brother sister friend teacher doctor neighbour uncle aunt cousin child children
    people family team class group company boss student baby grandmother grandfather
    old new young big small long short warm cold hot cool wet dry dark bright quiet loud busy empty
    happy sad tired hungry angry kind strange funny easy hard early late slow fast cheap expensive
    red blue green yellow white black brown grey
    of to for with from about into over under near behind between across through around without
    one two three four five six seven eight nine ten hundred first second third last next
    rain snow wind sun cloud storm weather sky light fire smoke stone sand grass tree flower leaf
    money job work plan idea question answer problem reason moment hour minute time place way
"""
FILLER_WORDS: tuple[str, ...] = tuple(_FILLER_TEXT.split())
