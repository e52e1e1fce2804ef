#!/bin/sh
# Installed by Bangerfile.example as /etc/profile.d/banger-example.sh: greets login shells in
# the sandbox so it is obvious which machine you are on.
printf 'banger sandbox for %s (%s)\n' "${BANGER_PROJECT:-this project}" "$(uname -r)"
