"""The text a `<video>` marker expands to, as transformers' SmolVLMProcessor.replace_video_token writes it:

    "You are provided the following series of {N in words} frames from a {H:MM:SS} [H:MM:SS] video.\\n"
    then per frame "\\nFrame from {MM}:{SS}:" + <fake_token_around_image><global-img><image>*image_seq_len
    <fake_token_around_image>, then "\\n\\n".

N in words is num2words' English ("sixty-four", "one hundred and one"); the duration is the whole seconds of
total frames / fps, as datetime.timedelta prints them; a frame's MM is its whole minutes (past 59 for a long video),
SS its seconds within the minute.
"""
from __future__ import annotations

import re
from datetime import timedelta

from ..errors import InputError
from .image_tokens import ImageTokens

VIDEO_TOKEN = "<video>"  # the marker a chat template writes for a video block
MAX_VIDEOS = 4  # videos in one prompt: each is up to max_frames frames through the vision encoder
INTRO = "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
FRAME = "\nFrame from {timestamp}:"
OUTRO = "\n\n"

# transformers' DEFAULT_CHAT_TEMPLATE of SmolVLMProcessor: what it renders a conversation with a video with.
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'] is string %}"
    "{{': ' + message['content']}}{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}"
    "{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def video_prompt(timestamps: list[float], duration: float, tokens: ImageTokens, image_seq_len: int) -> str:
    """The expansion of one `<video>` marker for frames at `timestamps` (seconds) of a `duration`-second video."""
    frame = tokens.prompt(0, 0, image_seq_len)  # one unsplit image per frame
    text = INTRO.format(count=number_words(len(timestamps)), duration=str(timedelta(seconds=int(duration))))
    for t in timestamps:
        text += FRAME.format(timestamp=f"{int(t // 60):02d}:{int(t % 60):02d}") + frame
    return text + OUTRO


ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """num2words(n) in English for 0 <= n < 10^6: "twenty-one", "one hundred and five", "two thousand and ten",
    "one thousand, two hundred and thirty-four"."""
    if not 0 <= n < 1_000_000:
        raise InputError(f"frame count {n} out of range for the video prompt")
    if n < 1000:
        return _below_thousand(n)
    thousands, rest = divmod(n, 1000)
    head = f"{_below_thousand(thousands)} thousand"
    if rest == 0:
        return head
    return f"{head}{', ' if rest >= 100 else ' and '}{_below_thousand(rest)}"


def _below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    if hundreds == 0:
        return _below_hundred(rest)
    head = f"{ONES[hundreds]} hundred"
    return head if rest == 0 else f"{head} and {_below_hundred(rest)}"


def _below_hundred(n: int) -> str:
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] if ones == 0 else f"{TENS[tens]}-{ONES[ones]}"


def split_markers(text: str, image_marker: str) -> list[str]:
    """text cut at each image and video marker: [text, marker, text, marker, ..., text] (one pass, as transformers
    replaces them, so an expansion is never read again for markers)."""
    return re.split(f"({re.escape(image_marker)}|{re.escape(VIDEO_TOKEN)})", text)


def check_video_count(text: str, n_videos: int, max_videos: int) -> None:
    in_text = text.count(VIDEO_TOKEN)
    if in_text != n_videos:
        raise InputError(f"the text has {in_text} {VIDEO_TOKEN} markers but {n_videos} videos were passed")
    if n_videos > max_videos:
        raise InputError(f"a prompt has {n_videos} videos, over the limit of {max_videos} (max_videos)")
