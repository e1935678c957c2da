"""``nimbus dns``: an authoritative DNS server that answers each app's name
with the gateways of its best healthy region."""
