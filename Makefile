# Thin wrappers: every target is a nox session (see noxfile.py), so `make X` and `nox -s X` agree.
NOX ?= nox
.PHONY: dev demo test artifact lint lock images pull test-docker
dev:       ## one .venv with this package installed (editable): `source .venv/bin/activate`, then `mtpquant --help`
	$(NOX) -s dev
demo:      ## the whole chain on tiny GLM-5 and GLM-4.5 layout fixtures, on this CPU
	$(NOX) -s demo
test:      ## the test suite (what CI runs)
	$(NOX) -s tests
artifact:  ## the real GLM-5.2 W4A16+MTP artifact (needs GPUs and the hub)
	$(NOX) -s artifact
lint:
	$(NOX) -s lint
lock:      ## regenerate every lockfile in pinned/
	$(NOX) -s lock
images:    ## build the images (CPU flavour here; `nox -s images -- --flavour cuda --plan` lists the CUDA pins)
	$(NOX) -s images
pull:      ## fetch the published images by digest (builds where none matches the working tree)
	$(NOX) -s pull
test-docker: ## the image tests: real builds, registry push/pull by digest, the chain inside (needs .ci/docker-setup)
	$(NOX) -s tests -- -m docker
