"""Country names and codes in one normal form, so that a worker's ``--countries`` and a
task's country compare equal however each was written.

The normal form is the ISO 3166-1 alpha-2 code in upper case: ``"MY"``, ``"my"``,
``"Malaysia"`` and ``" malaysia "`` are all ``"MY"``. Specs name countries as words
(``country = "Malaysia"``, which also picks the cascade's policy row), operators type codes or
names; codes are short in the workers table and in warnings. A name this table does not know
(a made-up country of a test spec) keeps its words, upper-cased with its spaces collapsed, so
it still matches itself in any case.

The names are geoip2fast's (the same data ``fetchers.geo`` reports exit countries with), plus
a few common aliases; kept here as text so that parsing a flag loads no data file.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

_TABLE = (
    "AD:Andorra;AE:United Arab Emirates;AF:Afghanistan;AG:Antigua and Barbuda;"
    "AI:Anguilla;AL:Albania;AM:Armenia;AO:Angola;AQ:Antarctica;AR:Argentina;"
    "AS:American Samoa;AT:Austria;AU:Australia;AW:Aruba;AX:Åland Islands;AZ:Azerbaijan;"
    "BA:Bosnia and Herzegovina;BB:Barbados;BD:Bangladesh;BE:Belgium;BF:Burkina Faso;"
    "BG:Bulgaria;BH:Bahrain;BI:Burundi;BJ:Benin;BL:Saint Barthélemy;BM:Bermuda;BN:Brunei;"
    "BO:Bolivia;BQ:Bonaire, Sint Eustatius, and Saba;BR:Brazil;BS:Bahamas;BT:Bhutan;"
    "BV:Bouvet Island;BW:Botswana;BY:Belarus;BZ:Belize;CA:Canada;"
    "CC:Cocos (Keeling) Islands;CD:DR Congo;CF:Central African Republic;"
    "CG:Congo Republic;CH:Switzerland;CI:Ivory Coast;CK:Cook Islands;CL:Chile;"
    "CM:Cameroon;CN:China;CO:Colombia;CR:Costa Rica;CU:Cuba;CV:Cabo Verde;CW:Curaçao;"
    "CX:Christmas Island;CY:Cyprus;CZ:Czechia;DE:Germany;DJ:Djibouti;DK:Denmark;"
    "DM:Dominica;DO:Dominican Republic;DZ:Algeria;EC:Ecuador;EE:Estonia;EG:Egypt;"
    "EH:Western Sahara;ER:Eritrea;ES:Spain;ET:Ethiopia;FI:Finland;FJ:Fiji;"
    "FK:Falkland Islands;FM:Federated States of Micronesia;FO:Faroe Islands;FR:France;"
    "GA:Gabon;GB:United Kingdom;GD:Grenada;GE:Georgia;GF:French Guiana;GG:Guernsey;"
    "GH:Ghana;GI:Gibraltar;GL:Greenland;GM:Gambia;GN:Guinea;GP:Guadeloupe;"
    "GQ:Equatorial Guinea;GR:Greece;GS:South Georgia and the South Sandwich Islands;"
    "GT:Guatemala;GU:Guam;GW:Guinea-Bissau;GY:Guyana;HK:Hong Kong;"
    "HM:Heard and McDonald Islands;HN:Honduras;HR:Croatia;HT:Haiti;HU:Hungary;"
    "ID:Indonesia;IE:Ireland;IL:Israel;IM:Isle of Man;IN:India;"
    "IO:British Indian Ocean Territory;IQ:Iraq;IR:Iran;IS:Iceland;IT:Italy;JE:Jersey;"
    "JM:Jamaica;JO:Jordan;JP:Japan;KE:Kenya;KG:Kyrgyzstan;KH:Cambodia;KI:Kiribati;"
    "KM:Comoros;KN:St Kitts and Nevis;KP:North Korea;KR:South Korea;KW:Kuwait;"
    "KY:Cayman Islands;KZ:Kazakhstan;LA:Laos;LB:Lebanon;LC:Saint Lucia;LI:Liechtenstein;"
    "LK:Sri Lanka;LR:Liberia;LS:Lesotho;LT:Lithuania;LU:Luxembourg;LV:Latvia;LY:Libya;"
    "MA:Morocco;MC:Monaco;MD:Moldova;ME:Montenegro;MF:Saint Martin;MG:Madagascar;"
    "MH:Marshall Islands;MK:North Macedonia;ML:Mali;MM:Myanmar;MN:Mongolia;MO:Macao;"
    "MP:Northern Mariana Islands;MQ:Martinique;MR:Mauritania;MS:Montserrat;MT:Malta;"
    "MU:Mauritius;MV:Maldives;MW:Malawi;MX:Mexico;MY:Malaysia;MZ:Mozambique;NA:Namibia;"
    "NC:New Caledonia;NE:Niger;NF:Norfolk Island;NG:Nigeria;NI:Nicaragua;"
    "NL:The Netherlands;NO:Norway;NP:Nepal;NR:Nauru;NU:Niue;NZ:New Zealand;OM:Oman;"
    "PA:Panama;PE:Peru;PF:French Polynesia;PG:Papua New Guinea;PH:Philippines;"
    "PK:Pakistan;PL:Poland;PM:Saint Pierre and Miquelon;PN:Pitcairn Islands;"
    "PR:Puerto Rico;PS:Palestine;PT:Portugal;PW:Palau;PY:Paraguay;QA:Qatar;RE:Réunion;"
    "RO:Romania;RS:Serbia;RU:Russia;RW:Rwanda;SA:Saudi Arabia;SB:Solomon Islands;"
    "SC:Seychelles;SD:Sudan;SE:Sweden;SG:Singapore;SH:Saint Helena;SI:Slovenia;"
    "SJ:Svalbard and Jan Mayen;SK:Slovakia;SL:Sierra Leone;SM:San Marino;SN:Senegal;"
    "SO:Somalia;SR:Suriname;SS:South Sudan;ST:São Tomé and Príncipe;SV:El Salvador;"
    "SX:Sint Maarten;SY:Syria;SZ:Eswatini;TC:Turks and Caicos Islands;TD:Chad;"
    "TF:French Southern Territories;TG:Togo;TH:Thailand;TJ:Tajikistan;TK:Tokelau;"
    "TL:Timor-Leste;TM:Turkmenistan;TN:Tunisia;TO:Tonga;TR:Türkiye;"
    "TT:Trinidad and Tobago;TV:Tuvalu;TW:Taiwan;TZ:Tanzania;UA:Ukraine;UG:Uganda;"
    "UM:U.S. Outlying Islands;US:United States;UY:Uruguay;UZ:Uzbekistan;VA:Vatican City;"
    "VC:St Vincent and Grenadines;VE:Venezuela;VG:British Virgin Islands;"
    "VI:U.S. Virgin Islands;VN:Vietnam;VU:Vanuatu;WF:Wallis and Futuna;WS:Samoa;"
    "XK:Kosovo;YE:Yemen;YT:Mayotte;ZA:South Africa;ZM:Zambia;ZW:Zimbabwe;"
)

_ALIASES = {
    "netherlands": "NL", "holland": "NL", "uk": "GB", "great britain": "GB",
    "britain": "GB", "england": "GB", "usa": "US", "united states of america": "US",
    "america": "US", "russian federation": "RU", "turkey": "TR", "czech republic": "CZ",
    "korea": "KR", "republic of korea": "KR", "viet nam": "VN", "macau": "MO",
    "cote d'ivoire": "CI", "côte d'ivoire": "CI", "burma": "MM", "swaziland": "SZ",
    "cape verde": "CV", "vatican": "VA", "uae": "AE", "democratic republic of the congo": "CD",
    "republic of the congo": "CG", "east timor": "TL", "macedonia": "MK",
}  # fmt: skip


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


@functools.cache
def _names() -> dict[str, str]:
    out: dict[str, str] = {}
    for entry in "".join(_TABLE).split(";"):
        if entry:
            code, _, name = entry.partition(":")
            out[_key(name)] = code
            out[code.casefold()] = code
    out.update(_ALIASES)
    return out


def normal_country(text: str | None) -> str | None:
    """The normal form of a country name or code (None for None or blank)."""
    if text is None or not text.strip():
        return None
    return _names().get(_key(text)) or " ".join(text.split()).upper()


def is_known(text: str) -> bool:
    """Whether ``text`` names a country of ISO 3166 (by code, name or a common alias)."""
    return _key(text) in _names()


def parse_countries(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"India, my"`` or ``["India", "MY"]`` → ``("IN", "MY")``: normal forms, sorted,
    once each. Empty (None, blank, ``any``): every country."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    codes = {c for p in parts if (c := normal_country(p)) is not None}
    if "ANY" in codes:  # "any" (e.g. to override a host's stored countries)
        return ()
    return tuple(sorted(codes))


def countries_text(countries: Iterable[str]) -> str | None:
    """How a worker's countries are stored and shown: ``"IN,MY"``; None for any."""
    codes = sorted(set(countries))
    return ",".join(codes) or None
