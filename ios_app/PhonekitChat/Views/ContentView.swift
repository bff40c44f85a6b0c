import SwiftUI
import UniformTypeIdentifiers

struct ContentView: View {
    @Environment(ChatModel.self) private var model

    var body: some View {
        NavigationStack {
            Group {
                switch model.phase {
                case .browsing:
                    BundleListView()
                case .details, .verifying, .loading:
                    BundleDetailView()
                case .chat:
                    ChatView()
                }
            }
            .navigationTitle(model.selected?.manifest?.model.id ?? "phonekit Chat")
            .navigationBarTitleDisplayMode(.inline)
        }
    }
}

struct BundleListView: View {
    @Environment(ChatModel.self) private var model
    @State private var importing = false

    var body: some View {
        List {
            if model.bundles.isEmpty {
                Section("No bundles yet") {
                    Text("Copy a folder written by `phonekit export` into this app: Finder > iPhone > Files > phonekit Chat, the Files app, the Import button, or `phonekit push ios` on a Mac.")
                }
            }
            ForEach(model.bundles) { bundle in
                Button {
                    model.select(bundle)
                } label: {
                    VStack(alignment: .leading) {
                        Text(bundle.name).font(.headline)
                        if let m = bundle.manifest {
                            Text("\(m.model.id) · \(m.quantization.scheme) · \(m.artifacts.map(\.format).joined(separator: ", "))")
                                .font(.subheadline)
                        } else {
                            Text(bundle.problem ?? "unreadable").font(.subheadline).foregroundStyle(.red)
                        }
                    }
                }
                .disabled(bundle.manifest == nil)
            }
            if let error = model.error {
                Text(error).foregroundStyle(.red)
            }
        }
        .refreshable { model.refresh() }
        .toolbar {
            Button("Import") { importing = true }
        }
        .fileImporter(isPresented: $importing, allowedContentTypes: [.folder]) { result in
            if case .success(let url) = result { model.importFolder(url) }
        }
        .onAppear { model.refresh() }
    }
}
