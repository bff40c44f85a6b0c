pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}

dependencyResolutionManagement {
    // Every dependency comes from these two repositories (plus the onnxruntime-genai AAR
    // in app/libs, which Microsoft publishes only as a GitHub release asset).
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
    }
}

rootProject.name = "phonekit-chat"
include(":app")
