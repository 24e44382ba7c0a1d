#compdef grpoctl

_grpoctl_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _GRPOCTL_COMPLETE=complete_zsh grpoctl)
}

compdef _grpoctl_completion grpoctl