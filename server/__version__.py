VERSION = "0.1.0"
# What /api/version reports. Clients gate features on Ollama's version (VS Code
# Copilot wants >= 0.6.4; Open WebUI parses it as dotted integers), so kiln reports
# the Ollama API level it implements, not its own version.
OLLAMA_COMPAT = "0.12.3"
