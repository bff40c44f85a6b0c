import SwiftUI

@main
struct PhonekitChatApp: App {
    @State private var model = ChatModel()
    @Environment(\.scenePhase) private var scenePhase

    var body: some Scene {
        WindowGroup {
            ContentView()
                .environment(model)
                // A bundle copied in through Finder while the app was away shows up on return.
                .onChange(of: scenePhase) { _, phase in
                    if phase == .active { model.refresh() }
                }
        }
    }
}
