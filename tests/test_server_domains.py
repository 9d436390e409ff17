"""--allowed-image-domains compares host names in their ASCII (IDNA) form: httpx.URL.host IDNA-decodes a host only when
the whole of it starts with "xn--" (https://xn--bcher-kva.de/ -> "bücher.de", but https://img.bücher.de/ ->
"img.xn--bcher-kva.de"), so an internationalized domain must match in either spelling; bad names are refused."""
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")  # the server package imports it; GPU images may lack it

from smolvlm_fast.serving.server.images import domain_allowed


@pytest.mark.parametrize("url, allowed", [
    ("https://xn--bcher-kva.de/cat.png", "xn--bcher-kva.de"),
    ("https://img.bücher.de/cat.png", "bücher.de"),
])
def test_idn_allowed_domain_matches_its_hosts(url, allowed):
    host = httpx.URL(url).host  # what _fetch passes to domain_allowed
    assert domain_allowed(host, (allowed,))


@pytest.mark.parametrize("bad", ["example.com:443", "*.example.com", "http://example.com", "", "a b.com", "a/b"])
def test_a_bad_allowed_domain_is_refused_when_the_server_starts(bad):
    from smolvlm_fast import InputError
    from smolvlm_fast.serving.server.images import ImageSource
    from smolvlm_fast.serving.server.limits import Limits

    with pytest.raises(InputError, match="allowed image domain"):
        ImageSource(Limits(), None, False, (bad,))
